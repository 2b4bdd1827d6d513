"""The arq-hosted workers: consume the event streams in batches and write Postgres."""

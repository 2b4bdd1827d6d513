"""The management API: workspaces, keys, links, programs, webhooks and their reads, in
Postgres; the schema's migration and check."""

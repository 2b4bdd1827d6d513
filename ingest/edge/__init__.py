"""The hot edge: validate, authenticate and rate-limit a request and append its event, in one
Redis round trip shared by the requests of a moment. One module per dialect in ``routes``."""

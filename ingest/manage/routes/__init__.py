"""The management API's routes: objects, stats and fraud settings, webhooks."""

"""The server host: processes (the prefork supervisor), sockets, middleware, the health
routes, the OpenAPI document, and the app that puts the rooms together."""

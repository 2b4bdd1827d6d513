"""The server host: processes (the prefork supervisor), sockets, each route's wrapper, the health
routes, the OpenAPI document, and the app that puts the rooms together."""

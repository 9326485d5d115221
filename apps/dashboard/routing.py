"""Websocket routes (all under /ws/). The live event stream `/ws/events/` belongs to the dashboard issue."""
websocket_urlpatterns: list = []

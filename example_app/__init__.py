"""The quart-wslb example: a chat that runs as several Hypercorn instances on one Redis.

``python -m example_app`` starts the instances (and a throwaway Redis when
``WSLB_REDIS_URL`` is unset); ``python -m example_app --demo`` also drives two WebSocket
clients across them and exits. The Quart app is ``example_app.app:app``.
"""

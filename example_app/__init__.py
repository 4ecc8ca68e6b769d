"""The quart-wslb example: a chat that runs as several Hypercorn instances on one Redis.

``python -m example_app`` starts three instances behind a round-robin front (and a
throwaway Redis when ``WSLB_REDIS_URL`` is unset) and prints the one URL a browser needs;
``python -m example_app --demo`` also drives two WebSocket clients through the front, across
the instances, and exits. The Quart app is ``example_app.app:app``; the launcher is
:mod:`example_app.launcher`, the front :mod:`example_app.front`.
"""

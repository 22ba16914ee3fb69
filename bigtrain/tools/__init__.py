"""Tools built on the library (the layout parity harness); the library never imports them."""

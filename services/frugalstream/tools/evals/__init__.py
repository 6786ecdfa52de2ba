"""Offline evaluation of the models the services run (routing, pair verification); never imported by them."""

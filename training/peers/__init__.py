"""Peers' forecasting models run as their own code in their own environments (adapters)."""

"""The one trainer every mmt model trains with."""

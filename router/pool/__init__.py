"""The backends the router can use, their health and their live load."""

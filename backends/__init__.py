"""Backend adapters: every accelerator or engine the router can drive."""

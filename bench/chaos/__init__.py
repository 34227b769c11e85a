"""The chaos scenario's parts: fault plans, restartable devices, the injector, verdicts."""

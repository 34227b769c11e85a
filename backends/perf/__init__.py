"""The hardware performance model shared by mock devices, the scheduler and the simulator."""

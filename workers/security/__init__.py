"""Security workers' process-local drivers: DAC ownership and AppArmor profiles, with a durable journal."""

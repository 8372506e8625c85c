"""CLI subcommands of each model family: ``register(commands, train_commands)`` adds them."""

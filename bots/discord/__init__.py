"""The Discord channel, on discord.py: see :mod:`bots.discord.adapter`."""

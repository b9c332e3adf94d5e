"""Stand-ins for what the bot talks to: Discord, Segmind, and a TCP proxy that can make a service hang."""

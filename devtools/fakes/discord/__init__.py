"""The Discord stand-in: REST API v10 and gateway over real sockets (`server.DiscordStandIn`)."""

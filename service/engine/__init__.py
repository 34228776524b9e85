"""WhatsApp engines: the port, the simulated phone, whatsmeow, and worker processes."""

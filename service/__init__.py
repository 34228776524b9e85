"""Session Manager: the one authority over WhatsApp Web sessions."""

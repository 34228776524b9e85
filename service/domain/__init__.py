"""The domain: the contract's enums and errors, the state machine, sessions, watchers."""

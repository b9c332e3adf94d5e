"""The fault suite: the real bot process under injected faults and SIGKILLs (`suite`)."""

"""Working with attached adapters: parameter counts, methods compared, adapters combined."""

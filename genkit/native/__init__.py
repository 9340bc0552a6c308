"""Native quantised execution paths (GGUF weights run as they are)."""

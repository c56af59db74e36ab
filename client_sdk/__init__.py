"""Client SDK: resolve a flag, then call the personalization system its arm names."""

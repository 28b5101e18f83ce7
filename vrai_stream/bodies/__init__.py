"""Request bodies: raw audio, multipart forms and legacy JSON, decoded as they arrive."""

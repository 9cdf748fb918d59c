"""FastAPI web service (avatars, reenactments, jobs, real-time stream); no torch imports."""

"""Thin aiohttp faces of rcds: serving repositories over HTTP."""

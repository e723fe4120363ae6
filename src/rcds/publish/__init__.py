"""The publish service: queue, repositories, presence, access times, auth. Knows nothing of HTTP frameworks."""

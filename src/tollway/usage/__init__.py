"""Usage records: the bounded queue that writes them, rollups and statistics."""

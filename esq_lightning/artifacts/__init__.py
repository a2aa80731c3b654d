"""What a run leaves on disk: results.json records, the resolver of finished runs, checkpoint reading, export, atomic writes."""

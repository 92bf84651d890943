"""Data: sources to Parquet shards (`prepare`), shards to training workers (`stream`, Ray Data)."""

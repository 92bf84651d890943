"""Speed benchmarks of epd-ray, each against a reference measured in the same run (see README.md)."""

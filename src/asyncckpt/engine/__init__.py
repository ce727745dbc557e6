"""The moving parts of a save and a restore: staging copies, the background writer, the reader."""

"""What `tracker list`, `show`, `status` and `watch` print: rich tables for people, JSON for
programs, read from the store into plain data first."""

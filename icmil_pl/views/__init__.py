"""What a person looks at: a run's report.html (`report`) and its slides in a browser (`viewer`)."""

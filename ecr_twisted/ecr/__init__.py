"""ECR's authorization token: fetched in a child process, kept fresh."""

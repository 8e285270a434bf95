"""vitjax."""

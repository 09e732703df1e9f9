"""A local stand-in for the AWS Lambda service, reachable by boto3 through ``endpoint_url``."""

"""Kubernetes edge: names, labels and configuration shared by the controller, webhook and agent."""

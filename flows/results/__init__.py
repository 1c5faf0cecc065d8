"""What a run leaves for people to read: the summary and stage table (`report`), the HTML page
(`html_report`) and the MLflow registry with its promotion gate (`registry`). Imported by the flow and
the commands above it; imports only `flows.config`.
"""

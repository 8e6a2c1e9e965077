"""The delivery process of callbacks (`sluicegate webhooks`)."""

"""The model lifecycle: a training dataset from what a deployment saw, and bundle-against-bundle evaluation."""

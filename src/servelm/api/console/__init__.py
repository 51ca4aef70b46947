"""The web console: pages for users (models, playground, account) and operators."""

"""Claude wherever production runs it: the Claude API, Amazon Bedrock, Google Vertex AI, Microsoft Foundry.

`base` holds what is pure (accounts, the providers' facts as data, model ids and prices); one
module per provider builds the `anthropic` SDK's client for an account and names its errors;
`clients` builds every account's client and hands each pair the one of its account.
"""

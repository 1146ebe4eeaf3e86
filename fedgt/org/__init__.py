"""What runs at an organization's site: its policy, private fine-tune, ledger, release, ClientApp."""

# The two commands of the README. Each installs .venv on first use (scripts/install.sh).
VENV  := .venv
STAMP := $(VENV)/.grove-installed

.PHONY: train test install
install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $(STAMP)

# make train ARGS="trainer.total_steps=20 logger=none"
train: $(STAMP)
	$(VENV)/bin/grove train $(ARGS)

# make test PYTEST_ARGS="-k buffer"
test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

package webhook

import (
	"context"
	"errors"
)

// Run is `stasis webhook`. Placeholder until the admission-webhook issue lands.
func Run(ctx context.Context, args []string) error { return errors.New("webhook: not implemented yet") }

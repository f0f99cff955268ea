package webhook

import (
	"context"
	"fmt"

	"github.com/rs/zerolog"
	kwhlog "github.com/slok/kubewebhook/v2/pkg/log"
)

// kwhLogger adapts zerolog to kubewebhook's logger interface.
type kwhLogger struct{ l zerolog.Logger }

// NewKubewebhookLogger returns kubewebhook's logger writing to l.
func NewKubewebhookLogger(l zerolog.Logger) kwhlog.Logger { return kwhLogger{l: l} }

func (k kwhLogger) Infof(format string, args ...any)    { k.l.Info().Msg(fmt.Sprintf(format, args...)) }
func (k kwhLogger) Warningf(format string, args ...any) { k.l.Warn().Msg(fmt.Sprintf(format, args...)) }
func (k kwhLogger) Errorf(format string, args ...any)   { k.l.Error().Msg(fmt.Sprintf(format, args...)) }
func (k kwhLogger) Debugf(format string, args ...any)   { k.l.Debug().Msg(fmt.Sprintf(format, args...)) }

func (k kwhLogger) WithValues(values map[string]any) kwhlog.Logger {
	return kwhLogger{l: k.l.With().Fields(values).Logger()}
}

type kwhCtxKey struct{}

func (k kwhLogger) WithCtxValues(ctx context.Context) kwhlog.Logger {
	if v, ok := ctx.Value(kwhCtxKey{}).(map[string]any); ok {
		return k.WithValues(v)
	}
	return k
}

func (k kwhLogger) SetValuesOnCtx(parent context.Context, values map[string]any) context.Context {
	merged := map[string]any{}
	if v, ok := parent.Value(kwhCtxKey{}).(map[string]any); ok {
		for key, val := range v {
			merged[key] = val
		}
	}
	for key, val := range values {
		merged[key] = val
	}
	return context.WithValue(parent, kwhCtxKey{}, merged)
}

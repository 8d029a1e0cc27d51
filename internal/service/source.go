package service

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/sendonce/sendonce/internal/config"
	"github.com/sendonce/sendonce/source"
	"github.com/sendonce/sendonce/source/amqp"
	"github.com/sendonce/sendonce/source/natsjs"
	"github.com/sendonce/sendonce/source/redisstream"
	"github.com/sendonce/sendonce/source/sqs"
)

// newSource builds the consumer of one validated source setting. Each
// constructor connects once, so that a wrong queue, stream or dead-letter
// destination stops the start with its reason.
func newSource(ctx context.Context, src config.Source, log *slog.Logger) (source.Source, error) {
	switch src.Kind() {
	case "sqs":
		return sqs.New(ctx, sqs.Options{
			QueueURL:           src.SQS,
			Tenant:             src.Tenant,
			Concurrency:        src.Concurrency,
			WaitTime:           time.Duration(src.WaitTime),
			VisibilityTimeout:  time.Duration(src.VisibilityTimeout),
			DeadLetterQueueURL: src.DeadLetterQueue,
			Logger:             log,
		})
	case "amqp":
		return amqp.New(ctx, amqp.Options{
			URL:                             src.AMQP,
			Queue:                           src.Queue,
			Tenant:                          src.Tenant,
			Prefetch:                        src.Prefetch,
			Concurrency:                     src.Concurrency,
			BatchSize:                       src.BatchSize,
			DeadLetterExchange:              src.DeadLetterExchange,
			DeadLetterRoutingKey:            src.DeadLetterRoutingKey,
			RejectWithoutDeadLetterExchange: src.RejectWithoutDeadLetterExchange,
			Logger:                          log,
		})
	case "nats":
		return natsjs.New(ctx, natsjs.Options{
			URL:               src.NATS,
			Stream:            src.Stream,
			Consumer:          src.Consumer,
			Tenant:            src.Tenant,
			Concurrency:       src.Concurrency,
			BatchSize:         src.BatchSize,
			AckWait:           time.Duration(src.AckWait),
			MaxDeliver:        src.MaxDeliveries,
			DeadLetterSubject: src.DeadLetterSubject,
			Logger:            log,
		})
	case "redis":
		return redisstream.New(ctx, redisstream.Options{
			URL:              src.Redis,
			Stream:           src.Stream,
			Group:            src.Group,
			Consumer:         src.Consumer,
			Tenant:           src.Tenant,
			Concurrency:      src.Concurrency,
			BatchSize:        src.BatchSize,
			ClaimIdle:        time.Duration(src.ClaimIdle),
			MaxDeliveries:    src.MaxDeliveries,
			DeadLetterStream: src.DeadLetterStream,
			Logger:           log,
		})
	}
	return nil, fmt.Errorf("no broker kind; give sqs, amqp, nats or redis")
}

// SourceStats are the counts of each broker source that keeps them
// (received, admitted, duplicates, dead-lettered, errors), by name: what
// a metrics exporter reads.
func (s *Service) SourceStats() map[string]source.Stats {
	out := map[string]source.Stats{}
	for _, src := range s.sources {
		if r, ok := src.(source.StatsReporter); ok {
			out[src.Name()] = r.Stats()
		}
	}
	return out
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// asynq measures Client.EnqueueContext, one task per call, into a queue of
// its own, the task made unique by asynq.TaskID(key) (a second enqueue of
// the key is refused with ErrTaskIDConflict for as long as the task is in
// Redis) or, with -asynq-unique unique, by asynq.Unique(24h) over the queue,
// type and payload (which carries the key).
func (b *bench) asynq(ctx context.Context, mode string) (Row, error) {
	row := Row{System: "asynq", Store: "redis", Mode: mode, Durable: b.o.redisDurable}
	if !b.o.redisDurable {
		row.Note = "not durable (Redis " + b.o.redisSettings + "): an acknowledged task is lost if Redis stops"
	}
	queue := "peers_" + b.tag + "_" + mode
	b.queues = append(b.queues, queue)
	client := asynq.NewClient(asynq.RedisClientOpt{Addr: b.o.Redis})
	defer client.Close()
	payload := body(b.o.Size)
	k := newKeyer("key-", b.o.Concurrency, mode == "dup")
	m, err := drive(ctx, b.o.Concurrency, 1, b.o.Duration, k, func(ctx context.Context, keys []string) (int, error) {
		data, err := json.Marshal(emailArgs{Key: keys[0], Body: payload})
		if err != nil {
			return 0, err
		}
		uniq := asynq.TaskID(keys[0])
		if b.o.AsynqUnique == "unique" {
			uniq = asynq.Unique(24 * time.Hour)
		}
		_, err = client.EnqueueContext(ctx, asynq.NewTask("email", data), asynq.Queue(queue), uniq)
		switch {
		case errors.Is(err, asynq.ErrTaskIDConflict), errors.Is(err, asynq.ErrDuplicateTask):
			return 1, nil
		case err != nil:
			return 0, err
		}
		return 0, nil
	})
	m.System, m.Store, m.Mode, m.Durable, m.Note = row.System, row.Store, row.Mode, row.Durable, row.Note
	if err != nil {
		return m, err
	}
	rdb := redis.NewClient(&redis.Options{Addr: b.o.Redis})
	defer rdb.Close()
	if m.Stored, err = rdb.LLen(ctx, "asynq:{"+queue+"}:pending").Result(); err != nil {
		return m, fmt.Errorf("count asynq's pending tasks: %w", err)
	}
	return m, nil
}

// redisDurability reads the server's persistence settings: an enqueue is
// durable when acknowledged only if every write is fsync'd to the AOF.
func redisDurability(ctx context.Context, addr string) (bool, string) {
	rdb := redis.NewClient(&redis.Options{Addr: addr})
	defer rdb.Close()
	get := func(name string) string {
		v, err := rdb.ConfigGet(ctx, name).Result()
		if err != nil {
			return "?"
		}
		return v[name]
	}
	aof, fsync, save := get("appendonly"), get("appendfsync"), get("save")
	ver := "?"
	if info, err := rdb.Info(ctx, "server").Result(); err == nil {
		for line := range strings.SplitSeq(info, "\r\n") {
			if v, ok := strings.CutPrefix(line, "redis_version:"); ok {
				ver = v
			}
		}
	}
	settings := fmt.Sprintf("%s: appendonly %s, appendfsync %s, save %q", ver, aof, fsync, save)
	return aof == "yes" && fsync == "always", settings
}

// cleanupRedis deletes every key of the run's queues, a few thousand at a
// time (UNLINK: freed in the background, so Redis keeps answering others).
func (b *bench) cleanupRedis() {
	if len(b.queues) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rdb := redis.NewClient(&redis.Options{Addr: b.o.Redis})
	defer rdb.Close()
	for _, q := range b.queues {
		var cursor uint64
		for {
			keys, next, err := rdb.Scan(ctx, cursor, "asynq:{"+q+"}:*", 5000).Result()
			if err != nil {
				fmt.Fprintf(b.log, "clean up asynq queue %s: %v\n", q, err)
				break
			}
			if len(keys) > 0 {
				if err := rdb.Unlink(ctx, keys...).Err(); err != nil {
					fmt.Fprintf(b.log, "clean up asynq queue %s: %v\n", q, err)
					break
				}
			}
			if cursor = next; cursor == 0 {
				break
			}
		}
		rdb.SRem(ctx, "asynq:queues", q)
	}
}

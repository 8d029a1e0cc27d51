package tests

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp091 "github.com/rabbitmq/amqp091-go"
	"github.com/redis/go-redis/v9"
)

// brokerNeeded skips the test loudly when a broker is absent, and fails
// it under CI=true.
func brokerNeeded(t *testing.T, what string, err error) {
	t.Helper()
	msg := fmt.Sprintf("SKIPPED: %s is not reachable (%v)", what, err)
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and %s", msg)
	}
	t.Skip(msg)
}

func randomName(prefix string) string {
	var b [5]byte
	rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// brokerCase is one broker as `sendonce serve --source` sees it.
type brokerCase struct {
	// setup makes the queue or stream, and returns the --source flag, a
	// publish function, and a count of the dead letters.
	setup func(t *testing.T) (flag string, publish func(body, key string), deadLetters func() int)
}

var brokerCases = map[string]brokerCase{
	"redis": {func(t *testing.T) (string, func(string, string), func() int) {
		rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:6379"})
		t.Cleanup(func() { rdb.Close() })
		ctx := context.Background()
		if err := rdb.Ping(ctx).Err(); err != nil {
			brokerNeeded(t, "Redis on 127.0.0.1:6379", err)
		}
		stream := randomName("sendonce-e2e-")
		t.Cleanup(func() { rdb.Del(context.Background(), stream, stream+":dead") })
		publish := func(body, key string) {
			vals := []any{"job", body}
			if key != "" {
				vals = append(vals, "idempotency_key", key)
			}
			if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: vals}).Err(); err != nil {
				t.Fatal(err)
			}
		}
		dead := func() int { n, _ := rdb.XLen(ctx, stream+":dead").Result(); return int(n) }
		return "redis://127.0.0.1:6379/0?stream=" + stream + "&group=sendonce&claim_idle=5s", publish, dead
	}},
	"amqp": {func(t *testing.T) (string, func(string, string), func() int) {
		conn, err := amqp091.Dial("amqp://guest:guest@127.0.0.1:5672/")
		if err != nil {
			brokerNeeded(t, "RabbitMQ on 127.0.0.1:5672", err)
		}
		t.Cleanup(func() { conn.Close() })
		ch, err := conn.Channel()
		if err != nil {
			t.Fatal(err)
		}
		q := randomName("sendonce-e2e-")
		must := func(err error) {
			if err != nil {
				t.Fatal(err)
			}
		}
		must(ch.ExchangeDeclare(q+".dlx", "fanout", true, false, false, false, nil))
		_, err = ch.QueueDeclare(q+".dead", true, false, false, false, nil)
		must(err)
		must(ch.QueueBind(q+".dead", "", q+".dlx", false, nil))
		_, err = ch.QueueDeclare(q, true, false, false, false, amqp091.Table{"x-dead-letter-exchange": q + ".dlx"})
		must(err)
		t.Cleanup(func() {
			ch.QueueDelete(q, false, false, false)
			ch.QueueDelete(q+".dead", false, false, false)
			ch.ExchangeDelete(q+".dlx", false, false)
		})
		must(ch.Confirm(false))
		publish := func(body, key string) {
			dc, err := ch.PublishWithDeferredConfirmWithContext(context.Background(), "", q, true, false,
				amqp091.Publishing{DeliveryMode: amqp091.Persistent, MessageId: key, Body: []byte(body)})
			must(err)
			if ok, err := dc.WaitContext(context.Background()); !ok || err != nil {
				t.Fatalf("publish not confirmed: %v", err)
			}
		}
		dead := func() int {
			st, err := ch.QueueDeclarePassive(q+".dead", true, false, false, false, nil)
			must(err)
			return st.Messages
		}
		return "amqp://guest:guest@127.0.0.1:5672/?queue=" + q + "&dead_letter_exchange=" + q + ".dlx", publish, dead
	}},
	"nats": {func(t *testing.T) (string, func(string, string), func() int) {
		nc, err := nats.Connect("nats://127.0.0.1:4222", nats.Timeout(3*time.Second))
		if err != nil {
			brokerNeeded(t, "NATS on 127.0.0.1:4222", err)
		}
		t.Cleanup(nc.Close)
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		name := strings.ToUpper(randomName("SENDONCE_E2E_"))
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{strings.ToLower(name) + ".jobs"}}); err != nil {
			brokerNeeded(t, "JetStream on 127.0.0.1:4222", err)
		}
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name + "_DEAD", Subjects: []string{"sendonce.dead." + name}}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			js.DeleteStream(context.Background(), name)
			js.DeleteStream(context.Background(), name+"_DEAD")
		})
		publish := func(body, key string) {
			m := nats.NewMsg(strings.ToLower(name) + ".jobs")
			m.Data = []byte(body)
			if key != "" {
				m.Header.Set("idempotency_key", key)
			}
			if _, err := js.PublishMsg(ctx, m); err != nil {
				t.Fatal(err)
			}
		}
		dead := func() int {
			st, err := js.Stream(ctx, name+"_DEAD")
			if err != nil {
				t.Fatal(err)
			}
			info, err := st.Info(ctx)
			if err != nil {
				t.Fatal(err)
			}
			return int(info.State.Msgs)
		}
		return "nats://127.0.0.1:4222?stream=" + name + "&consumer=sendonce", publish, dead
	}},
}

// TestServeConsumesEachBroker: `sendonce serve --source URL` for RabbitMQ,
// NATS JetStream and Redis Streams. A job published twice under one key
// (the second time with the key only beside the body) is delivered once
// into the maildir and counted as a duplicate; a malformed job is
// dead-lettered.
func TestServeConsumesEachBroker(t *testing.T) {
	t.Parallel()
	for name, bc := range brokerCases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			flag, publish, deadLetters := bc.setup(t)
			key := "welcome/" + randomName("")
			job := emailJSON("ann@example.com", "Welcome via "+name)
			publish(strings.Replace(job, "{", fmt.Sprintf(`{"key": %q, `, key), 1), "")
			publish(job, key)
			publish(`{"from": "noreply@example.org", "colour": "blue"}`, "")

			dir := t.TempDir()
			maildir := filepath.Join(dir, "mail")
			s := startServerArgs(t, filepath.Join(dir, "data"), []string{"--source", flag, "--transport", "maildir:" + maildir},
				"SENDONCE_DISPATCH_POLL_INTERVAL=100ms")
			eventually(t, 60*time.Second, "the email sent once, the repeat a duplicate, the malformed job dead-lettered", func() (bool, string) {
				r, err := s.get(key)
				dl := deadLetters()
				return err == nil && r.State == "sent" && r.Duplicates == 1 && dl == 1, fmt.Sprintf("%+v %v; %d dead letters", r, err, dl)
			})
			s.stop()
			files, _ := os.ReadDir(filepath.Join(maildir, "new"))
			if len(files) != 1 {
				t.Errorf("%d files in the maildir, want 1", len(files))
			}
		})
	}
}
